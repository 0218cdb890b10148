"""User-defined losses: `define` (re-exported as `entangle_sim.losses.define`), `user_names`, `undefine`.

A definition is checked before it is registered: the builder is run on strict versions of both
backends (an unknown `F.name` or `v.name` is named), the SymPy expression must be a scalar in the
pair variables and the declared hyperparameters, free of discontinuous functions and
differentiable by SymPy, and at a few ordinary states (policy = reference among them) the JAX
value, `jax.grad` and the SymPy derivative must be finite and the two backends must agree.
"""
from __future__ import annotations

import dataclasses
import inspect
import keyword
import math
import re
import traceback
from typing import Callable

import numpy as np
import sympy as sp

from ..symbolic.functions import lambdify_numpy
from ..symbolic.symbols import GRAM_VARS, PAIR_VARS
from ..types import PairState
from .base import JAX, SYM, Hyper, PairVars
from .registry import aliases, names, register, unregister
from .spec import LossSpec

_USER: dict[str, tuple] = {}  # name -> origin (file, qualname, line) of the builder that defined it
DEFINED: list[str] = []  # every successful define, in order (the CLI loader reports a file's losses)
BACKEND_FUNCTIONS = tuple(k for k in vars(JAX) if k != "name")
PAIR_ATTRIBUTES = (*PAIR_VARS, "r_w", "r_l", "avg_w", "avg_l")
_RESERVED = {*PAIR_VARS, *(str(s) for s in PAIR_VARS.values()), *GRAM_VARS, "d_w", "d_l", "v", "F"}
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
# Discontinuous (or non-analytic in a way no gradient step can use) SymPy heads in a loss.
_JUMPS = (sp.floor, sp.ceiling, sp.frac, sp.sign, sp.Heaviside, sp.Mod, sp.DiracDelta, sp.Piecewise)

# Ordinary states (TRL names): policy = reference (every run starts here), a typical pair, a pair
# with a prompt (ORPO-style NLL), single-token responses.
ORDINARY_STATES = (
    dict(chosen_logps=-12.0, rejected_logps=-15.0, ref_chosen_logps=-12.0, ref_rejected_logps=-15.0,
         chosen_len=6.0, rejected_len=9.0, prompt_logps=0.0, prompt_len=0.0),
    dict(chosen_logps=-12.0, rejected_logps=-15.0, ref_chosen_logps=-11.0, ref_rejected_logps=-14.5,
         chosen_len=6.0, rejected_len=9.0, prompt_logps=0.0, prompt_len=0.0),
    dict(chosen_logps=-30.0, rejected_logps=-20.0, ref_chosen_logps=-28.0, ref_rejected_logps=-25.0,
         chosen_len=10.0, rejected_len=4.0, prompt_logps=-5.0, prompt_len=3.0),
    dict(chosen_logps=-1.2, rejected_logps=-2.5, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0,
         chosen_len=1.0, rejected_len=1.0, prompt_logps=0.0, prompt_len=0.0),
)


class LossDefinitionError(ValueError):
    """A user loss (`define`) that cannot work; the message names the problem and the state."""


class _Unknown(Exception):
    pass


class _StrictBackend:
    """The backend `F` with a clear error for a function it does not have."""

    def __init__(self, ns):
        self._ns = ns

    def __getattr__(self, key):
        try:
            return getattr(self._ns, key)
        except AttributeError:
            raise _Unknown(f"the math backend F has no function {key!r}; available: "
                           f"{', '.join(BACKEND_FUNCTIONS)} (plus + - * / ** and abs)") from None


class _StrictPairVars(PairVars):
    def __getattr__(self, key):
        raise _Unknown(f"the pair variables v have no attribute {key!r}; available: {', '.join(PAIR_ATTRIBUTES)}")


def fmt_state(state: dict, hp: dict | None = None) -> str:
    """'chosen_logps=-12, ... (beta=0.1)' for messages."""
    s = ", ".join(f"{k}={float(v):.6g}" for k, v in state.items() if not k.startswith("prompt") or v)
    if hp:
        s += " (" + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in hp.items()) + ")"
    return s


def _where(exc: BaseException, fn) -> str:
    """' at FILE:LINE `source`' of the deepest frame in the builder's own file, if any."""
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if code and f.filename == code.co_filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" ({f.filename}:{f.lineno}" + (f" `{f.line.strip()}`)" if f.line else ")")


def _explain(exc: BaseException, backend: str) -> str:
    """A hint for the usual ways a builder fails on one backend."""
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, _Unknown):
        return msg
    if "truth value" in low or "tracerbool" in type(exc).__name__.lower() or "concretization" in low:
        return (f"it branches on a value (if/and/or/comparison): {msg.splitlines()[0]}. A loss must be one "
                "formula; use F.relu, F.minimum, F.sigmoid or abs for kinks")
    if re.search(r"(Greater|Less)Than|Relational|Boolean|Equality", msg):
        return (f"it compares values ({msg.splitlines()[0]}): a comparison is a step, not differentiable; use "
                "F.relu, F.minimum, F.sigmoid or abs for kinks")
    if "ufunc" in low or "__array__" in low or "tracerarrayconversion" in type(exc).__name__.lower() \
            or "numpy" in low:
        return f"it calls numpy directly ({msg.splitlines()[0]}); use the backend F instead"
    if "jax type" in low or "jax.numpy" in low or "not a valid jax" in low or "abstract array" in low:
        return f"it calls jax/jax.numpy directly ({msg.splitlines()[0]}); use the backend F instead"
    if "convert expression to float" in low or "must be real number" in low:
        return f"it calls math (or float()) directly ({msg.splitlines()[0]}); use the backend F instead"
    return f"building it with the {backend} backend failed: {type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"


def _hypers(fn, hyperparameters) -> tuple[Hyper, ...]:
    """Declared hyperparameters reconciled with the builder's keyword-only parameters."""
    if isinstance(hyperparameters, dict):
        hs = []
        for k, h in hyperparameters.items():
            if isinstance(h, Hyper):
                if h.name != k:
                    raise LossDefinitionError(f"hyperparameters[{k!r}] is a Hyper named {h.name!r}")
                hs.append(h)
            elif isinstance(h, (int, float)) and not isinstance(h, bool):
                hs.append(Hyper(k, float(h), ""))
            else:
                raise LossDefinitionError(f"hyperparameter {k!r}: give a default number or a losses.Hyper, got {h!r}")
    else:
        hs = list(hyperparameters or ())
        for h in hs:
            if not isinstance(h, Hyper):
                raise LossDefinitionError(f"hyperparameters must be losses.Hyper objects (or a dict), got {h!r}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise LossDefinitionError(f"the builder {fn!r} is not a Python function") from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) > 2 and len(positional) - 2 == len([p for p in positional[2:] if p.default is not p.empty]):
        raise LossDefinitionError(f"hyperparameters must be keyword-only: write `def {getattr(fn, '__name__', 'fn')}"
                                  f"(v, F, *, {', '.join(p.name for p in positional[2:])})`")
    if len(positional) != 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        fname = getattr(fn, "__name__", "fn")
        raise LossDefinitionError(f"the builder must be `def {fname}(v, F, *, <hyperparameters>)`: two positional "
                                  f"arguments (pair variables v, backend F), got {sig}")
    kwonly = {p.name: p for p in params if p.kind == p.KEYWORD_ONLY}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    declared = {h.name for h in hs}
    for p in kwonly.values():
        if p.name not in declared:
            if p.default is inspect.Parameter.empty:
                raise LossDefinitionError(f"keyword-only argument {p.name!r} has no default and is not declared in "
                                          "hyperparameters=")
            if not isinstance(p.default, (int, float)) or isinstance(p.default, bool):
                raise LossDefinitionError(f"hyperparameter {p.name!r}: default {p.default!r} is not a number")
            hs.append(Hyper(p.name, float(p.default), ""))
    for h in hs:
        if h.name not in kwonly and not has_var_kw:
            raise LossDefinitionError(f"hyperparameter {h.name!r} is declared but the builder has no keyword-only "
                                      f"argument {h.name!r}")
    order = list(kwonly)
    hs.sort(key=lambda h: order.index(h.name) if h.name in order else len(order))
    names = [h.name for h in hs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LossDefinitionError(f"hyperparameter {sorted(dup)[0]!r} declared twice")
    symbols = {}
    for h in hs:
        if not h.name.isidentifier() or keyword.iskeyword(h.name):
            raise LossDefinitionError(f"hyperparameter name {h.name!r} is not a Python identifier")
        sym = str(h.symbol())
        if h.name in _RESERVED or sym in _RESERVED:
            raise LossDefinitionError(f"hyperparameter name {h.name!r} clashes with a variable of the theory "
                                      f"({', '.join(sorted(_RESERVED))})")
        if sym in symbols:
            raise LossDefinitionError(f"hyperparameters {symbols[sym]!r} and {h.name!r} share the symbol {sym!r}")
        symbols[sym] = h.name
        try:
            h.check(h.default)
        except ValueError as e:
            raise LossDefinitionError(f"default out of its own range: {e}") from None
    return tuple(hs)


def kink_distance(exprs, args):
    """A NumPy function of `args` giving the distance, in log-prob units, to the nearest kink.

    Kinks are the zeros of the arguments a of Heaviside, sign, Abs, Max and Min (pairwise
    differences) in `exprs`; distance = min |a| / max(|da/dl_w|, |da/dl_l|) (first order), inf if none.
    """
    ell = (PAIR_VARS["chosen_logps"], PAIR_VARS["rejected_logps"])
    kinks = set()
    for e in exprs:
        for a in e.atoms(sp.Heaviside, sp.sign, sp.Abs, sp.DiracDelta):
            kinks.add(a.args[0])
        for a in e.atoms(sp.Max, sp.Min):
            xs = a.args
            kinks.update(xs[i] - xs[j] for i in range(len(xs)) for j in range(i + 1, len(xs)))
    parts = [(lambdify_numpy(tuple(args), k), [lambdify_numpy(tuple(args), sp.diff(k, x)) for x in ell])
             for k in kinks]

    def distance(*vals):
        out = np.inf
        with np.errstate(all="ignore"):
            for f, (dfw, dfl) in parts:
                a = np.abs(np.asarray(f(*vals), dtype=float))
                g = np.maximum(np.abs(np.asarray(dfw(*vals), dtype=float)), np.abs(np.asarray(dfl(*vals), dtype=float)))
                out = np.minimum(out, np.where(a == 0, 0.0, a / np.maximum(g, 1e-300)))
        return out

    return distance


def _origin(fn) -> tuple:
    code = getattr(fn, "__code__", None)
    return (code.co_filename if code else None, getattr(fn, "__qualname__", None),
            code.co_firstlineno if code else None)


def _check_name(name: str, origin, replace: bool) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LossDefinitionError(f"loss name {name!r} must start with a letter and use letters, digits, _ or -")
    if name in aliases():
        raise LossDefinitionError(f"loss name {name!r} is an alias of the built-in loss "
                                  f"{aliases()[name]!r}; pick another name")
    if name in names() and name not in _USER:
        raise LossDefinitionError(f"loss name {name!r} clashes with a built-in loss; pick another name")
    if name in _USER and not replace and _USER[name] != origin:
        raise LossDefinitionError(f"a user loss named {name!r} is already defined (in {_USER[name][0]}); "
                                  "pass replace=True to redefine it")


def _build_sym(spec, fn):
    v = _StrictPairVars(**PAIR_VARS)
    try:
        expr = spec.build(v, _StrictBackend(SYM), **spec.sym_hypers())
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not raised raw
        raise LossDefinitionError(f"loss {spec.name!r} cannot be derived symbolically{_where(e, fn)}: "
                                  f"{_explain(e, 'SymPy')}") from None
    if isinstance(expr, (int, float)):
        expr = sp.nsimplify(expr)
    if not isinstance(expr, sp.Expr) or isinstance(expr, sp.logic.boolalg.Boolean):
        raise LossDefinitionError(f"loss {spec.name!r}: the builder must return one scalar expression, got "
                                  f"{type(expr).__name__} ({str(expr)[:80]})")
    allowed = set(PAIR_VARS.values()) | {s for s in spec.sym_hypers().values() if isinstance(s, sp.Basic)}
    stray = expr.free_symbols - allowed
    if stray:
        raise LossDefinitionError(f"loss {spec.name!r}: the expression contains symbols {sorted(map(str, stray))} "
                                  "that are neither pair variables nor declared hyperparameters")
    jumps = sorted({type(a).__name__ for a in expr.atoms(sp.Function, sp.Mod, sp.Piecewise) if isinstance(a, _JUMPS)})
    if expr.atoms(sp.logic.boolalg.BooleanFunction, sp.core.relational.Relational, sp.logic.boolalg.BooleanAtom):
        jumps.append("a comparison")
    if jumps:
        raise LossDefinitionError(f"loss {spec.name!r} is not differentiable: it uses {', '.join(jumps)}, which "
                                  "jumps (its gradient is zero or undefined, so a gradient step cannot use it)")
    ell_w, ell_l = PAIR_VARS["chosen_logps"], PAIR_VARS["rejected_logps"]
    grads = []
    for s in (ell_w, ell_l):
        d = sp.diff(expr, s)
        if d.atoms(sp.Derivative, sp.Subs):
            bad = sorted({str(a.expr if isinstance(a, sp.Derivative) else a)[:60]
                          for a in d.atoms(sp.Derivative, sp.Subs)})
            raise LossDefinitionError(f"loss {spec.name!r} is not differentiable: SymPy cannot differentiate "
                                      f"{', '.join(bad)}")
        if d.atoms(sp.DiracDelta):
            raise LossDefinitionError(f"loss {spec.name!r} is not differentiable: its derivative contains a "
                                      "Dirac delta (the loss jumps)")
        grads.append(d)
    return expr, grads


def _ordinary_checks(spec, fn, expr, grads) -> None:
    """JAX value and jax.grad (jit) vs SymPy value and derivative at the ordinary states."""
    import jax
    import jax.numpy as jnp

    hp = spec.defaults
    numeric_hp = {k: v for k, v in hp.items() if not isinstance(v, str)}
    sym_hp = spec.sym_hypers()
    names = dict(PAIR_VARS)
    names.update({k: s for k, s in sym_hp.items() if isinstance(s, sp.Symbol)})
    args = list(names.values())
    f_sym = lambdify_numpy(tuple(args), expr)
    g_sym = [lambdify_numpy(tuple(args), g) for g in grads]
    strict = _StrictBackend(JAX)
    kink = kink_distance([expr, *grads], args)

    def jloss(lw, ll, rest):
        v = PairState(lw, ll, *rest).as_arrays()
        return spec.build(_StrictPairVars(**v._asdict()), strict, **hp)

    value_and_grad = jax.jit(jax.value_and_grad(jloss, argnums=(0, 1)))
    for st in ORDINARY_STATES:
        rest = [st[k] for k in list(PAIR_VARS)[2:]]
        dt = jnp.result_type(float)
        try:
            val, (gw, gl) = value_and_grad(jnp.asarray(st["chosen_logps"], dt), jnp.asarray(st["rejected_logps"], dt),
                                           [jnp.asarray(x, dt) for x in rest])
        except Exception as e:  # noqa: BLE001
            raise LossDefinitionError(f"loss {spec.name!r} does not run under jax.jit/jax.grad{_where(e, fn)}: "
                                      f"{_explain(e, 'JAX')}") from None
        if jnp.shape(val) != ():
            raise LossDefinitionError(f"loss {spec.name!r}: the builder must return one value per pair, got shape "
                                      f"{jnp.shape(val)} for one pair")
        vals = [np.float64(st[k] if k in st else numeric_hp[k]) for k in names]
        with np.errstate(all="ignore"):
            sval = float(np.asarray(f_sym(*vals)))
            sg = [float(np.asarray(g(*vals))) for g in g_sym]
        where = fmt_state(st, numeric_hp)
        checks = [("loss value (JAX)", float(val)), ("dL/dchosen_logps (jax.grad)", float(gw)),
                  ("dL/drejected_logps (jax.grad)", float(gl)), ("loss value (SymPy)", sval),
                  ("dL/dchosen_logps (SymPy)", sg[0]), ("dL/drejected_logps (SymPy)", sg[1])]
        for what, x in checks:
            if not math.isfinite(x):
                raise LossDefinitionError(f"loss {spec.name!r} is not finite at an ordinary state: {what} = {x} at "
                                          f"{where}" + (" (policy = reference, where every run starts)"
                                                        if st is ORDINARY_STATES[0] else ""))
        # The two backends must build the same function (loose: JAX may run in float32 here).
        # Derivatives are compared only off kinks (relu, abs, ...: any subgradient is valid there).
        on_kink = float(kink(*vals)) < 1e-9
        for what, a, b in (("loss value", float(val), sval), ("dL/dchosen_logps", float(gw), sg[0]),
                           ("dL/drejected_logps", float(gl), sg[1])):
            if what != "loss value" and on_kink:
                continue
            if abs(a - b) > 1e-4 * max(abs(a), abs(b)) + 1e-6:
                raise LossDefinitionError(f"loss {spec.name!r}: the JAX and SymPy backends disagree at {where}: "
                                          f"{what} {a:.9g} (JAX) vs {b:.9g} (SymPy); the builder must compute the "
                                          "same formula on both backends")


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
    if fn is None:
        return lambda f: define(name, f, hyperparameters=hyperparameters, description=description, trl=trl,
                                margin=margin, nll=nll, reference=reference, replace=replace, check=check)
    if not callable(fn):
        raise LossDefinitionError(f"loss {name!r}: the builder must be a function `fn(v, F, *, ...)`, got {fn!r}")
    origin = _origin(fn)
    _check_name(name, origin, replace)
    hypers = _hypers(fn, hyperparameters)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    description = description or (doc[0] if doc else f"user-defined loss {name}")
    spec = LossSpec(name=name, description=description, build=fn, hypers=hypers, trl=trl, margin=margin,
                            nll=nll, reference=reference or f"user-defined ({origin[0]})")
    expr, grads = _build_sym(spec, fn)
    refs = {PAIR_VARS["ref_chosen_logps"], PAIR_VARS["ref_rejected_logps"]}
    spec = dataclasses.replace(spec, uses_reference=bool(expr.free_symbols & refs))
    if check:
        _ordinary_checks(spec, fn, expr, grads)
    for extra, what in ((margin, "margin"), (nll, "nll")):
        if extra is not None:
            try:
                extra(_StrictPairVars(**PAIR_VARS), _StrictBackend(SYM), **spec.sym_hypers())
            except Exception as e:  # noqa: BLE001
                raise LossDefinitionError(f"loss {name!r}: its {what}= function fails{_where(e, extra)}: "
                                          f"{_explain(e, 'SymPy')}") from None
    register(spec, replace=name in _USER)  # a redefinition keeps its place in the listing
    _USER[name] = origin
    DEFINED.append(name)
    return spec


def user_names() -> list[str]:
    """Names of the losses defined with `define` (in definition order)."""
    return [n for n in names() if n in _USER]


def undefine(name: str) -> None:
    """Remove a loss defined with `define` (built-in losses cannot be removed)."""
    if name not in _USER:
        raise ValueError(f"{name!r} is not a user-defined loss")
    unregister(name)
    del _USER[name]

