"""First-order dynamics of one gradient step for any loss definition (docs/theory.md R3, R4, R8-R12).

The engine receives a loss definition as an argument (anything with `symbolic(**hp)`,
`symbolic_margin(**hp)`, `sym_hypers(**hp)`, `name`, `hypers`) and never imports the registry.

For a per-pair loss L(l_w, l_l) and one plain gradient step theta+ = theta - eta grad L:

    d_w = -dL/dl_w,  d_l = +dL/dl_l                      (incentives; R1, R21)
    Delta l_w ~ eta (d_w G_ww - d_l G_wl)                (R3, R8)
    Delta l_l ~ eta (d_w G_wl - d_l G_ll)
    Delta (l_w - l_l) ~ eta (d_w G_ww + d_l G_ll - (d_w + d_l) G_wl)     (R10)
    Delta L ~ -eta (d_w^2 G_ww - 2 d_w d_l G_wl + d_l^2 G_ll) <= 0

Example:
    >>> from entangle_sim import losses, symbolic
    >>> der = symbolic.derive(losses.get("sigmoid"))
    >>> der.chosen_threshold          # chosen rises iff G_wl <= 1 * G_ww  (Condition 1)
    1
    >>> round(float(der.delta_chosen(chosen_logps=-3., rejected_logps=-4., ref_chosen_logps=-3.,
    ...                  ref_rejected_logps=-3., G_ww=1., G_wl=2., G_ll=3., eta=1., beta=0.1)), 6)
    -0.047502
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import sympy as sp

from .. import regimes as _regimes
from . import compact, functions
from .functions import lambdify_jax, lambdify_numpy
from .states import sample_states
from .symbols import G_ll, G_wl, G_ww, PAIR_VARS, eta

_LABELS = {name: sp.Symbol(name) for name in _regimes.REGIMES}


@dataclasses.dataclass(frozen=True, eq=False)
class Formula:
    """A SymPy expression that renders as LaTeX and is callable on JAX arrays by keyword.

    `f(**values)` takes TRL-style pair names (`chosen_logps`, ...), `G_ww`, `G_wl`, `G_ll`, `eta`
    and hyperparameter names. Keyword-only and strict: a missing value, a name the derivation does
    not know (a typo) and a value for a hyperparameter the derivation fixed that differs from it
    all raise ValueError. Names of the derivation this formula does not use are ignored.
    """

    expr: sp.Expr
    names: tuple[tuple[str, sp.Symbol], ...]  # argument name -> symbol, for every free symbol
    known: frozenset = frozenset()  # every name of the derivation (pair variables, Gram, eta, hyperparameters)
    fixed: tuple = ()  # (name, value) of hyperparameters the derivation substituted

    def __call__(self, **values):
        self._check(values)
        syms = [s for _, s in self.names]
        # Arrays, not Python floats: a branch a Piecewise does not take (e.g. the alpha-divergence
        # score at a = 1) may divide by zero, which must give inf inside jnp.select, not raise.
        import jax.numpy as jnp

        args = [jnp.asarray(values[n]) for n, _ in self.names]
        out = lambdify_jax(syms, self.expr)(*args)
        stable = functions.log_space_products(self.expr)
        if stable is not None:
            # exp(a) sigma(b) overflows to inf * 0 = NaN where the product itself is tiny (AlphaPO's
            # incentives far from the policy in float32): there, and only there, the log-space form
            # exp(a + log sigma(b)) is used, so every finite value stays exactly as it was.
            out = jnp.where(jnp.isnan(out), lambdify_jax(syms, stable)(*args), out)
        return out

    def _check(self, values) -> None:
        missing = [n for n, _ in self.names if n not in values]
        if missing:
            raise ValueError(f"missing values for {missing}")
        if self.known:
            unknown = sorted(k for k in values if k not in self.known)
            if unknown:
                import difflib

                hint = {k: difflib.get_close_matches(k, sorted(self.known), n=1, cutoff=0.6) for k in unknown}
                hint = "; ".join(f"{k!r} (did you mean {v[0]!r}?)" for k, v in hint.items() if v)
                raise ValueError(f"unknown names {unknown} for this formula{': ' + hint if hint else ''}; "
                                 f"valid: {sorted(self.known)}")
        for k, fixed in self.fixed:
            if k in values and not _same_value(values[k], fixed):
                raise ValueError(f"{k}={values[k]!r} differs from the value this derivation was made for "
                                 f"({k}={fixed}); derive again with it")

    @property
    def arg_names(self) -> list[str]:
        return [n for n, _ in self.names]

    def latex(self) -> str:
        return sp.latex(self.expr)

    def _repr_latex_(self) -> str:
        return f"$\\displaystyle {self.latex()}$"

    def __str__(self) -> str:
        return str(self.expr)

    __repr__ = __str__


@dataclasses.dataclass(frozen=True, eq=False)
class SignInfo:
    """Whether an incentive can be negative: `proved` nonnegative, or a witness state where it is < 0.

    condition: the Relational `expr < 0` with provably positive factors divided out.
    """

    nonnegative: bool | None  # True: proved >= 0; False: a witness with < 0 exists; None: unknown
    how: str
    condition: Any
    witness: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"nonnegative": self.nonnegative, "how": self.how, "negative_when": str(self.condition),
                "witness": self.witness}


@dataclasses.dataclass(frozen=True, eq=False)
class Derivation:
    """Everything the first-order theory says about one loss (theory §3-4).

    Formulas (callable, LaTeX): loss, d_w, d_l, delta_chosen, delta_rejected, delta_margin,
    delta_loss and, for margin-form losses, margin z, delta_z and the step weight s = -m'(z).
    Relationals: chosen_rises (Delta l_w >= 0), rejected_falls (Delta l_l <= 0).
    chosen_threshold t_w, rejected_threshold t_l (valid where d_l > 0, resp. d_w > 0):
        chosen rises <=> G_wl <= t_w G_ww ;  rejected falls <=> G_wl <= t_l G_ll   (R9, R12)
    regime: Piecewise over the five regimes of `entangle_sim.regimes`.
    """

    loss_name: str
    hyper: dict[str, Any]
    loss: Formula
    d_w: Formula
    d_l: Formula
    delta_chosen: Formula
    delta_rejected: Formula
    delta_margin: Formula
    delta_loss: Formula
    chosen_rises: Any
    rejected_falls: Any
    chosen_threshold: Any
    rejected_threshold: Any
    regime: Any
    margin: Formula | None
    delta_z: Formula | None
    step_weight: Formula | None
    d_w_sign: SignInfo
    d_l_sign: SignInfo
    spec: Any = dataclasses.field(default=None, repr=False)
    hp: tuple = dataclasses.field(default=(), repr=False)
    hypers: tuple = ()  # the loss's hyperparameter definitions (each has .name, .check, .structural)

    @functools.cached_property
    def compact(self):
        """Named-symbol forms (m, z, s, h', d, t_w, t_l), each proved equal to the raw ones
        (`entangle_sim.symbolic.compact.CompactForm`)."""
        try:
            return compact.build(self.spec, self, dict(self.hp))
        except compact.NOT_COMPACT as err:  # a user loss of unusual shape: show the raw forms
            return compact.raw_form(self, f"compact form not available ({type(err).__name__}: {err})"[:200])

    @property
    def fourth_regime_possible(self) -> bool:
        """'chosen down, rejected up' can happen only if some incentive can be negative (R5)."""
        return not (self.d_w_sign.nonnegative and self.d_l_sign.nonnegative)

    def evaluate(self, **values) -> dict[str, Any]:
        """Numbers at a state: d_w, d_l, the three first-order changes and the regime name/code.

        Hyperparameter values are checked exactly as the loss checks them (range, type, finite);
        a structural one (e.g. f_divergence_type) must equal the value this derivation was made for.
        """
        self.check_hyperparameters(values)
        out = {k: getattr(self, k)(**values) for k in
               ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin")}
        out["regime_code"] = _regimes.classify(out["delta_chosen"], out["delta_rejected"])
        return out

    def check_hyperparameters(self, values: dict) -> None:
        """ValueError/TypeError naming the hyperparameter for a value the loss would refuse."""
        for h in self.hypers:
            if h.name not in values:
                continue
            h.check(values[h.name])
            fixed = self.hyper.get(h.name)
            if (h.structural or getattr(h, "keep_value", False)) and not isinstance(fixed, sp.Symbol):
                same = values[h.name] == fixed if h.structural else sp.nsimplify(values[h.name]) == fixed
                if not same:
                    raise ValueError(f"hyperparameter {h.name}={values[h.name]!r} differs from this "
                                     f"derivation's {h.name}={fixed}; derive again with it")

    def as_dict(self, latex: bool = False) -> dict[str, Any]:
        """JSON-ready strings (or LaTeX) of every result."""
        fmt = sp.latex if latex else str
        d = {"loss": self.loss_name,
             "hyperparameters": {k: str(v) for k, v in self.hyper.items()}}
        for k in ("loss", "d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin", "delta_loss",
                  "margin", "delta_z", "step_weight"):
            f = getattr(self, k)
            d[k if k != "loss" else "loss_expr"] = None if f is None else fmt(f.expr)
        for k in ("chosen_rises", "rejected_falls", "chosen_threshold", "rejected_threshold"):
            v = getattr(self, k)
            d[k] = None if v is None else fmt(v)
        d["d_w_sign"] = self.d_w_sign.as_dict()
        d["d_l_sign"] = self.d_l_sign.as_dict()
        d["fourth_regime_possible"] = self.fourth_regime_possible
        d["compact"] = self.compact.as_dict(latex_=latex)
        return d


def _same_value(given, fixed) -> bool:
    """A given value equals a fixed one (strings exactly, numbers as floats; traced or array values
    that cannot be compared concretely are accepted: only concrete mismatches are refused)."""
    if isinstance(fixed, str) or isinstance(given, str):
        return given == fixed
    try:
        g = np.asarray(given, dtype=float)
    except Exception:  # noqa: BLE001 - a traced value: cannot be compared here
        return True
    return bool(np.all(g == float(fixed)))


# ---------------------------------------------------------------------------------------------


def first_order(dw, dl):
    """(Delta l_w, Delta l_l, Delta(l_w - l_l), Delta L) for incentives dw, dl (R3, R8, R10)."""
    dcw = eta * (dw * G_ww - dl * G_wl)
    dcl = eta * (dw * G_wl - dl * G_ll)
    dmargin = eta * (dw * G_ww + dl * G_ll - (dw + dl) * G_wl)  # = dcw - dcl, in R10's form
    dloss = -eta * (dw**2 * G_ww - 2 * dw * dl * G_wl + dl**2 * G_ll)
    return dcw, dcl, dmargin, dloss


def regime_piecewise(dcw, dcl):
    """The five regimes as a Piecewise of the signs of the two changes (ties as in regimes.classify)."""
    L = _LABELS
    return sp.Piecewise(
        (L["stationary"], sp.And(sp.Eq(dcw, 0), sp.Eq(dcl, 0))),
        (L["chosen_up_rejected_down"], sp.And(dcw >= 0, dcl <= 0)),
        (L["both_up"], sp.And(dcw >= 0, dcl > 0)),
        (L["both_down"], sp.And(dcw < 0, dcl <= 0)),
        (L["chosen_down_rejected_up"], True),
    )


def _strip_positive(expr):
    """Divide out factors SymPy can prove positive (keeps the sign, shortens the condition)."""
    expr = sp.factor_terms(expr)
    if expr.is_Mul:
        keep = [a for a in expr.args if not a.is_positive]
        return sp.Mul(*keep) if keep else sp.S.One
    return expr


def sign_info(expr, names: dict, hyper_defaults: dict, n: int = 4000, seed: int = 0) -> SignInfo:
    """Decide the sign of an incentive: a SymPy proof of >= 0, or a verified negative witness."""
    cond = sp.StrictLessThan(_strip_positive(expr), 0)
    # Indicators of hinges are >= 0: replace them by a nonnegative dummy before asking SymPy.
    steps = {h: sp.Dummy("H", nonnegative=True) for h in expr.atoms(sp.Heaviside)}
    if expr.xreplace(steps).is_nonnegative:
        return SignInfo(True, "proved: every factor is nonnegative under the symbols' assumptions", cond)
    how = compact.prove_nonnegative(expr)
    if how is not None:
        return SignInfo(True, how, cond)
    # Search states (hyperparameters at their defaults) for a negative value, then verify exactly.
    e = expr.subs({names[k]: sp.nsimplify(v) for k, v in hyper_defaults.items() if k in names})
    proved_at_defaults = e.xreplace(steps).is_nonnegative
    free = sorted(e.free_symbols, key=str)
    rng = np.random.default_rng(seed)
    samples = sample_states(free, n, rng)
    with np.errstate(all="ignore"):
        vals = np.asarray(lambdify_numpy(free, e)(*[samples[s] for s in free]), dtype=float)
    vals = np.broadcast_to(vals, (n,))
    neg = np.flatnonzero(np.isfinite(vals) & (vals < 0))
    inv = {v: k for k, v in names.items()}
    for i in neg[:5]:
        point = {s: sp.Rational(samples[s][i]).limit_denominator(10**6) for s in free}
        exact = e.subs(point).rewrite(sp.exp).evalf(30)
        if exact.is_real and exact < 0:
            witness = {inv.get(s, str(s)): float(point[s]) for s in free}
            witness["value"] = float(exact)
            return SignInfo(False, "witness: exact evaluation at a state gives a negative value", cond, witness)
    if proved_at_defaults:
        return SignInfo(True, "proved at the default hyperparameters (other values not covered)", cond)
    return SignInfo(None, f"no negative value in {n} sampled states (not proved symbolically)", cond)


def _threshold(num, den):
    """num/den simplified to a stable form (cancel, then factor) for printing and assertions."""
    if den == 0:
        return None
    return sp.factor(sp.cancel(sp.together(num / den)))


def _formula(expr, names: dict[str, sp.Symbol], known: frozenset = frozenset(), fixed: tuple = ()) -> Formula:
    free = expr.free_symbols
    inv = {v: k for k, v in names.items()}
    unknown = [s for s in free if s not in inv]
    if unknown:
        raise ValueError(f"unnamed symbols {unknown} in {expr}")
    ordered = tuple(sorted(((inv[s], s) for s in free), key=lambda t: t[0]))
    return Formula(expr, ordered, known, fixed)


_formula_of = _formula


@functools.lru_cache(maxsize=512)
def _derive_cached(spec, hp_items: tuple) -> Derivation:
    hp = dict(hp_items)
    L = spec.symbolic(**hp)
    hyper_vals = spec.sym_hypers(**hp)
    names: dict[str, sp.Symbol] = dict(PAIR_VARS)
    names.update({"G_ww": G_ww, "G_wl": G_wl, "G_ll": G_ll, "eta": eta})
    for k, v in hyper_vals.items():
        if isinstance(v, sp.Symbol):
            names[k] = v
    ell_w, ell_l = PAIR_VARS["chosen_logps"], PAIR_VARS["rejected_logps"]
    known = frozenset(names) | {h.name for h in spec.hypers}
    fixed = tuple((k, v) for k, v in hyper_vals.items() if not isinstance(v, sp.Basic) or v.is_number)
    fixed = tuple((k, v if isinstance(v, str) else float(v)) for k, v in fixed)

    def _formula(expr, names):  # every formula of this derivation knows the same names
        return _formula_of(expr, names, known, fixed)

    dw = -sp.diff(L, ell_w)
    dl = sp.diff(L, ell_l)
    dcw, dcl, dmargin, dloss = first_order(dw, dl)

    margin = spec.symbolic_margin(**hp)
    delta_z = step_weight = None
    if margin is not None:
        zw, zl = sp.diff(margin, ell_w), sp.diff(margin, ell_l)
        delta_z = _formula(zw * dcw + zl * dcl, names)
        # s = -m'(z) = d_w / (dz/dl_w) for margin-form losses (the NLL part, if any, is excluded
        # by using the margin-only incentive).
        if zw != 0:
            L_margin_part = L - spec.symbolic_nll(**hp)
            s = sp.cancel(-sp.diff(L_margin_part, ell_w) / zw)
            step_weight = _formula(s, names)

    defaults = {h.name: h.default for h in spec.hypers if not h.structural and h.name not in hp}
    return Derivation(
        loss_name=spec.name,
        hyper={k: v for k, v in hyper_vals.items()},
        loss=_formula(L, names),
        d_w=_formula(dw, names),
        d_l=_formula(dl, names),
        delta_chosen=_formula(dcw, names),
        delta_rejected=_formula(dcl, names),
        delta_margin=_formula(dmargin, names),
        delta_loss=_formula(dloss, names),
        chosen_rises=sp.GreaterThan(dcw / eta, 0),
        rejected_falls=sp.LessThan(dcl / eta, 0),
        chosen_threshold=_threshold(dw, dl),
        rejected_threshold=_threshold(dl, dw),
        regime=regime_piecewise(dcw / eta, dcl / eta),
        margin=None if margin is None else _formula(margin, names),
        delta_z=delta_z,
        step_weight=step_weight,
        d_w_sign=sign_info(dw, names, defaults),
        d_l_sign=sign_info(dl, names, defaults),
        spec=spec,
        hp=hp_items,
        hypers=tuple(spec.hypers),
    )


def derive(spec, **hp) -> Derivation:
    """Derive the first-order dynamics of one loss (cached per loss and hyperparameters).

    spec: a loss definition (e.g. `entangle_sim.losses.get("sigmoid")`) or a registered loss name;
    hp: hyperparameters to fix (numbers become exact rationals); the others stay symbols.
    """
    if isinstance(spec, str):  # a name: resolved by the registry that installed itself (no import)
        if _RESOLVER is None:
            raise RuntimeError(f"derive({spec!r}): no loss registry is loaded: `import entangle_sim.losses` "
                               "first, or pass a loss definition (entangle_sim.losses.get(name))")
        spec = _RESOLVER(spec)
    spec = getattr(spec, "spec", spec)  # a resolved loss: its definition (give its values as hp)
    missing = [a for a in ("symbolic", "symbolic_margin", "sym_hypers", "name", "hypers") if not hasattr(spec, a)]
    if missing:
        raise TypeError(f"derive() needs a loss name or a loss definition (e.g. losses.get('sigmoid')); "
                        f"{spec!r} lacks {missing}")
    for k, v in hp.items():
        if not isinstance(v, (str, int, float, sp.Basic)) and not hasattr(v, "__float__"):
            raise TypeError(f"hyperparameter {k}={v!r} must be a number or a string")
    return _derive_cached(spec, tuple(sorted((k, _hashable(v)) for k, v in hp.items())))


_RESOLVER = None
_NAMES = None


def set_name_resolver(resolve, names) -> None:
    """Let `derive` accept loss names: `resolve(name) -> loss definition`, `names() -> [name]`.
    The registry installs its `get` and `names` here when it loads, so the engine itself never
    imports the registry (one-way: registry -> engine)."""
    global _RESOLVER, _NAMES
    _RESOLVER, _NAMES = resolve, names


def registered_names() -> list[str]:
    """Names of the registered losses (RuntimeError when no registry is loaded: the engine does not
    import one itself)."""
    if _NAMES is None:
        raise RuntimeError("no loss registry is loaded: `import entangle_sim.losses` first, or pass loss "
                           "definitions (entangle_sim.losses.get(name))")
    return list(_NAMES())


def _hashable(v):
    return v if isinstance(v, (str, int, float, sp.Basic)) else float(v)


def clear_cache() -> None:
    """Forget cached derivations and compiled formulas (for cold-start benchmarks)."""
    _derive_cached.cache_clear()
    functions.clear_lambdify_cache()
